"""Bad data is named before training, never a mid-run traceback (issue 16 item 2), and the image
size of a data source picks its default space (item 7)."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

from tofa_fast.cli import build_parser
from tofa_fast.train import TrainConfig
from tofa_fast.train import data as data_module
from tofa_fast.train.data import (
    DataWarning,
    ImageSet,
    decode_rgb,
    default_space_for_size,
    find_unreadable_images,
    load_data,
    native_image_size,
)


def _save(path, side: int = 12, fmt: str | None = None, seed: int = 0) -> str:
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (side, side + 3, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return str(path)


def _tree(root, classes=("cat", "dog"), per_class=4, test_per_class=2, side=12) -> str:
    for c, name in enumerate(classes):
        for i in range(per_class):
            _save(root / "train" / name / f"{i}.png", side, seed=10 * c + i)
        for i in range(test_per_class):
            _save(root / "test" / name / f"{i}.jpg", side, seed=100 + 10 * c + i)
    return str(root)


def _truncate(path) -> None:
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def _load(root, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # an unexpected warning fails the test
        return load_data(str(root), 16, None, 0, **kw)


# -- decoding ------------------------------------------------------------------------------------


def test_decode_rgb_reads_every_listed_extension(tmp_path):
    for fmt, ext in (
        ("PNG", "png"),
        ("JPEG", "jpg"),
        ("BMP", "bmp"),
        ("PPM", "ppm"),
        ("TIFF", "tif"),
        ("WEBP", "webp"),
    ):
        img = decode_rgb(_save(tmp_path / f"a.{ext}", 10, fmt))
        assert img.dtype == torch.uint8 and img.shape == (3, 10, 13), ext
    # an extension that lies: a PNG named .jpg decodes all the same
    assert decode_rgb(_save(tmp_path / "png_named.jpg", 10, "PNG")).shape == (3, 10, 13)


def test_decode_rgb_16_bit_png_becomes_uint8(tmp_path):
    from PIL import Image

    path = str(tmp_path / "deep.png")
    Image.fromarray(np.full((5, 7), 65535, dtype=np.uint16)).save(path)
    img = decode_rgb(path)
    assert img.dtype == torch.uint8 and img.shape == (3, 5, 7) and int(img.max()) == 255


def test_unreadable_files_are_named_with_their_reason(tmp_path):
    good = _save(tmp_path / "good.png")
    cut_jpg = _save(tmp_path / "cut.jpg", 40, "JPEG")
    _truncate(cut_jpg)
    cut_png = _save(tmp_path / "cut.png", 40)
    _truncate(cut_png)
    text = tmp_path / "text.png"
    text.write_text("not an image")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    bad = find_unreadable_images([good, cut_jpg, str(text), cut_png, str(empty)])
    assert [b.path for b in bad] == [cut_jpg, str(text), cut_png, str(empty)]
    assert "truncated" in bad[0].reason
    assert "not an image file" in bad[1].reason
    with pytest.raises(ValueError, match=r"text\.png: not an image file"):
        decode_rgb(str(text))


def test_checking_runs_on_a_thread_pool_with_a_progress_bar(tmp_path, monkeypatch, capsys):
    import threading

    monkeypatch.setattr(data_module, "PROGRESS_MIN_IMAGES", 3)
    monkeypatch.setattr(data_module, "_worker_count", lambda: 2)
    threads = set()
    real = data_module.decode_rgb

    def spy(path):
        threads.add(threading.get_ident())
        return real(path)

    monkeypatch.setattr(data_module, "decode_rgb", spy)
    paths = [_save(tmp_path / f"{i}.png", 6, seed=i) for i in range(130)]  # three chunks of 64
    assert find_unreadable_images(paths, desc="checking here") == []
    assert threads and threading.main_thread().ident not in threads
    assert "checking here" in capsys.readouterr().err


# -- ImageFolder trees ---------------------------------------------------------------------------


def test_a_clean_tree_loads_without_warnings(tmp_path):
    splits = _load(_tree(tmp_path / "d"))
    assert splits.classes == ["cat", "dog"] and len(splits.labelled) == 8 and len(splits.test) == 4


def test_an_unreadable_image_is_named_before_training(tmp_path):
    root = tmp_path / "d"
    _tree(root)
    _truncate(root / "test" / "dog" / "1.jpg")
    (root / "train" / "cat" / "2.png").write_text("hello")
    with pytest.raises(ValueError) as info:
        _load(root)
    message = str(info.value)
    assert message.startswith(f"2 of 12 images of {str(root)!r} cannot be read")
    assert str(root / "train" / "cat" / "2.png") in message and str(root / "test" / "dog" / "1.jpg") in message
    assert "--skip-bad-images" in message


def test_the_error_lists_the_first_few_and_counts_all(tmp_path):
    root = tmp_path / "d"
    _tree(root, per_class=9)
    for i in range(8):
        (root / "train" / "dog" / f"{i}.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match=r"^8 of 22 images .*; and 3 more\. Fix or remove them") as info:
        _load(root)
    assert str(info.value).count("dog") == data_module.LISTED_BAD_IMAGES


def test_skip_bad_images_lists_and_leaves_them_out(tmp_path):
    root = tmp_path / "d"
    _tree(root)
    bad = root / "train" / "cat" / "2.png"
    bad.write_text("hello")
    _truncate(root / "test" / "dog" / "1.jpg")
    with pytest.warns(DataWarning, match=r"skipping 2 unreadable images of 12") as record:
        splits = load_data(str(root), 16, None, 0, skip_bad_images=True)
    assert any(str(bad) in str(w.message) for w in record if w.category is DataWarning)
    assert len(splits.labelled) == 7 and str(bad) not in splits.labelled.source
    assert len(splits.test) == 3
    for i in range(len(splits.labelled)):  # what remains decodes: training cannot fail on it
        assert splits.labelled[i][0].shape == (3, 16, 16)


def test_skipping_every_image_of_a_training_class_is_an_error(tmp_path):
    root = tmp_path / "d"
    _tree(root, per_class=2)
    for i in range(2):
        (root / "train" / "dog" / f"{i}.png").write_text("x")
    with pytest.warns(DataWarning), pytest.raises(ValueError, match=r"train/dog' holds no readable images"):
        load_data(str(root), 16, None, 0, skip_bad_images=True)


def test_unlabelled_images_are_checked_too(tmp_path):
    root = tmp_path / "d"
    _tree(root)
    _save(root / "unlabelled" / "a.png")
    (root / "unlabelled" / "deep").mkdir()
    (root / "unlabelled" / "deep" / "b.jpg").write_text("nope")
    with pytest.raises(ValueError, match=r"unlabelled/deep/b\.jpg"):
        _load(root)
    with pytest.warns(DataWarning, match="skipping 1"):
        splits = load_data(str(root), 16, None, 0, skip_bad_images=True)
    assert list(splits.unlabelled.source) == [str(root / "unlabelled" / "a.png")]


def test_empty_class_folder_in_train_is_an_error_naming_it(tmp_path):
    root = tmp_path / "d"
    _tree(root)
    (root / "train" / "emu").mkdir()
    with pytest.raises(ValueError, match=r"class folder '.*train/emu' holds no images"):
        _load(root)


def test_empty_class_folder_in_test_is_a_warning_naming_it(tmp_path):
    root = tmp_path / "d"
    _tree(root)
    for f in (root / "test" / "dog").iterdir():
        f.unlink()
    with pytest.warns(DataWarning, match=r"class folder '.*test/dog' holds no images"):
        splits = load_data(str(root), 16, None, 0)
    assert len(splits.test) == 2 and splits.classes == ["cat", "dog"]


def test_a_test_class_missing_from_train_is_an_error(tmp_path):
    root = tmp_path / "d"
    _tree(root)
    _save(root / "test" / "zebra" / "0.png")
    with pytest.raises(ValueError, match=r"do not match the training classes: '.*test/zebra' has no counterpart"):
        _load(root)


def test_a_training_class_missing_from_test_is_a_warning(tmp_path):
    root = tmp_path / "d"
    _tree(root, classes=("cat", "dog", "owl"))
    for f in (root / "test" / "dog").iterdir():
        f.unlink()
    (root / "test" / "dog").rmdir()
    with pytest.warns(DataWarning, match=r"test' has no folder for training class\(es\) \['dog'\]"):
        splits = load_data(str(root), 16, None, 0)
    # test labels keep the training indices: owl is class 2 in both
    assert splits.classes == ["cat", "dog", "owl"]
    assert sorted(set(splits.test.labels.tolist())) == [0, 2]


def test_a_val_folder_is_held_to_the_same_rules(tmp_path):
    root = tmp_path / "d"
    _tree(root)
    _save(root / "val" / "cat" / "0.png")
    _save(root / "val" / "yak" / "0.png")
    with pytest.raises(ValueError, match=r"'.*val/yak' has no counterpart in train"):
        _load(root)


def test_non_image_files_are_ignored_with_a_warning_naming_the_folder(tmp_path):
    root = tmp_path / "d"
    _tree(root)
    (root / "train" / "cat" / "notes.txt").write_text("x")
    (root / "train" / "cat" / "labels.csv").write_text("x")
    (root / "train" / "README").write_text("x")
    (root / "train" / "dog" / ".DS_Store").write_bytes(b"\0\0")  # hidden: ignored silently
    (root / "train" / "dog" / "._0.png").write_bytes(b"\0\5\26\7")  # a macOS resource fork
    (root / "train" / ".ipynb_checkpoints").mkdir()  # not a class
    _save(root / "train" / "cat" / ".cache" / "x.png")  # hidden folder inside a class: not data
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        splits = load_data(str(root), 16, None, 0)
    messages = [str(w.message) for w in record if issubclass(w.category, DataWarning)]
    assert len(messages) == 2, messages
    assert any("README" in m and "directly in" in m for m in messages)
    non_images = next(m for m in messages if m.startswith("ignored 2 file(s) that are not images"))
    assert ".csv, .txt" in non_images and str(root / "train" / "cat") in non_images
    assert splits.classes == ["cat", "dog"] and len(splits.labelled) == 8
    assert not any(".cache" in p for p in splits.labelled.source)


def test_tree_without_class_folders_or_images(tmp_path):
    root = tmp_path / "d"
    (root / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="has no class folders"):
        _load(root)
    (root / "train" / "a").mkdir()
    with pytest.raises(ValueError, match="contains no images"):
        _load(root)


def test_file_order_is_unchanged(tmp_path):
    """The seeded labelled/unlabelled/validation splits index this order: it must stay what it was
    before checking existed (directories in sorted order, then file names), or resumed runs change."""
    root = tmp_path / "d"
    _tree(root, per_class=3)
    for name in ("sub/x.png", "sub-b/y.png", "a.png", "sub/a/z.png"):
        _save(root / "train" / "cat" / name)
    previous = [
        os.path.join(d, f)
        for d, _, files in sorted(os.walk(root / "train" / "cat"))
        for f in sorted(files)
        if f.endswith(".png")
    ]
    splits = _load(root)
    assert list(splits.labelled.source[: len(previous)]) == previous


def test_digits_needs_no_check(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("the in-memory digits set has no files to check")

    monkeypatch.setattr(data_module, "find_unreadable_images", refuse)
    monkeypatch.setattr(data_module, "_parallel_map", refuse)
    assert load_data("digits", 32, 2, 0).num_classes == 10


# -- torchvision sets ----------------------------------------------------------------------------


class _FileBackedSet:
    """Stands in for a file-backed torchvision set (Flowers102 keeps ``_image_files``)."""

    def __init__(self, root, n: int, broken: set[int]):
        self._image_files = [_save(root / f"{i}.jpg", 8, "JPEG", seed=i) for i in range(n)]
        for i in broken:
            _truncate(self._image_files[i])

    def __len__(self) -> int:
        return len(self._image_files)

    def __getitem__(self, index: int):
        from PIL import Image

        img = Image.open(self._image_files[index])
        img.load()
        return img.convert("RGB"), index % 2


def test_torchvision_items_that_do_not_read_are_named(tmp_path):
    from torchvision.transforms import v2

    ds = _FileBackedSet(tmp_path, 5, broken={3})
    transform = v2.Compose([v2.ToImage(), v2.Resize(8, antialias=True), v2.CenterCrop(8)])
    with pytest.raises(ValueError, match=r"1 of 5 images of 'flowers train' cannot be read: .*3\.jpg \(OSError"):
        data_module._materialise(ds, transform, 8, "flowers train", skip_bad_images=False)
    with pytest.warns(DataWarning, match=r"skipping 1 unreadable images of 5 in 'flowers train'"):
        images = data_module._materialise(ds, transform, 8, "flowers train", skip_bad_images=True)
    assert isinstance(images, ImageSet) and images.source.shape == (4, 3, 8, 8)
    assert images.labels.tolist() == [0, 1, 0, 0]


def test_torchvision_item_without_a_file_list_is_named_by_index():
    class InMemory:
        def __len__(self):
            return 3

        def __getitem__(self, index):
            if index == 1:
                raise OSError("broken record")
            return torch.zeros(3, 4, 4, dtype=torch.uint8), 0

    with pytest.raises(ValueError, match=r"InMemory\[1\] \(OSError: broken record\)"):
        data_module._materialise(InMemory(), lambda x: x, 4, "set", skip_bad_images=False)


# -- configuration and command line --------------------------------------------------------------


def test_skip_bad_images_flag_reaches_the_config():
    args = build_parser().parse_args(["train", "--skip-bad-images"])
    assert args.skip_bad_images is True
    assert build_parser().parse_args(["train"]).skip_bad_images is False
    config = TrainConfig(skip_bad_images=True)
    assert TrainConfig.from_dict(config.to_dict()).skip_bad_images is True
    assert TrainConfig().skip_bad_images is False


# -- native image size and the default space (item 7) --------------------------------------------


def test_native_size_of_named_sets_reads_nothing(tmp_path):
    assert native_image_size("digits") == 8
    assert native_image_size("mnist", root=str(tmp_path / "nowhere")) == 28
    assert native_image_size("Fashion-MNIST") == 28
    assert native_image_size("CIFAR10") == 32 and native_image_size("cifar100") == 32
    assert native_image_size("flowers102") > 64
    with pytest.raises(ValueError, match=r"--data 'imagenet' is neither a known data set"):
        native_image_size("imagenet")


def test_native_size_of_an_image_folder_is_the_median_header_side(tmp_path, monkeypatch):
    root = tmp_path / "d"
    sides = {"a": (28, 28, 28), "b": (28, 40, 28), "c": (200, 28, 30)}
    for name, per_class in sides.items():
        for i, side in enumerate(per_class):
            _save(root / "train" / name / f"{i}.png", side, seed=i)
    (root / "train" / "a" / "broken.png").write_text("x")  # unreadable headers are passed over
    opened = []
    from PIL import Image

    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda p, *a, **k: opened.append(p) or real_open(p, *a, **k))
    assert native_image_size(str(root)) == 28
    assert len(opened) <= 16
    assert native_image_size(str(root), sample=3) == 28  # one image from each class
    assert len(opened) <= 16 + 3


def test_native_size_of_a_large_tree_samples_a_few_headers(tmp_path, monkeypatch):
    root = tmp_path / "big"
    for c in range(40):
        for i in range(3):
            _save(root / "train" / f"c{c:02d}" / f"{i}.png", 96, seed=c)
    opened = []
    from PIL import Image

    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda p, *a, **k: opened.append(p) or real_open(p, *a, **k))
    assert native_image_size(str(root), sample=8) == 96
    assert len(opened) == 8 and len({os.path.dirname(p) for p in opened}) == 8  # spread over classes


def test_native_size_of_a_folder_without_readable_images(tmp_path):
    (tmp_path / "d" / "train" / "a").mkdir(parents=True)
    (tmp_path / "d" / "train" / "a" / "x.png").write_text("no")
    with pytest.raises(ValueError, match="found no readable image in"):
        native_image_size(str(tmp_path / "d"))
    with pytest.raises(ValueError, match="sample must be a positive integer"):
        native_image_size(str(tmp_path / "d"), sample=0)


@pytest.mark.parametrize(
    ("native", "space", "resolution"),
    [(8, "digits", 32), (28, "digits", 32), (29, "rss", 32), (32, "rss", 32), (64, "rss", 32), (65, "tofa", 320)],
)
def test_default_space_for_size(native, space, resolution):
    assert default_space_for_size(native) == (space, resolution)


def test_default_space_follows_the_data(tmp_path):
    assert default_space_for_size(native_image_size("digits"))[0] == "digits"
    assert default_space_for_size(native_image_size("mnist"))[0] == "digits"
    assert default_space_for_size(native_image_size("cifar10"))[0] == "rss"
    assert default_space_for_size(native_image_size("oxfordiiitpet"))[0] == "tofa"
    assert default_space_for_size(native_image_size(_tree(tmp_path / "mnist_like", side=28)))[0] == "digits"
    for bad in (0, -3, 2.5, True, "28"):
        with pytest.raises(ValueError, match="native_size must be a positive number of pixels"):
            default_space_for_size(bad)


def test_flowers102_trains_on_train_plus_val_as_tofa_does(monkeypatch, tmp_path):
    """TOFA's Table 2 trains Flowers102 on 2,040 images: the train *and* val splits (1,020 each)."""
    import torchvision.datasets as tvd

    opened = []

    class FakeFlowers:
        sizes = {"train": 6, "val": 4, "test": 3}

        def __init__(self, root, split, download=False):
            opened.append(split)
            self.split, self.classes = split, ["a", "b"]

        def __len__(self) -> int:
            return self.sizes[self.split]

        def __getitem__(self, index: int):
            offset = {"train": 0, "val": 100, "test": 200}[self.split]
            return torch.full((3, 8, 8), offset + index, dtype=torch.uint8), index % 2

    monkeypatch.setattr(tvd, "Flowers102", FakeFlowers)
    splits = data_module.load_torchvision("flowers102", str(tmp_path), 8, None, 0, False)
    assert sorted(opened) == ["test", "train", "val"]
    pool = [int(img[0, 0, 0]) for img, _ in splits.labelled]
    assert pool == [0, 1, 2, 3, 4, 5, 100, 101, 102, 103]  # train, then val
    assert splits.labelled.labels.tolist() == [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
    assert [int(img[0, 0, 0]) for img, _ in splits.test] == [200, 201, 202]
    assert splits.classes == ["a", "b"]


def test_image_sets_concatenate_in_order_and_refuse_mixed_parts(tmp_path):
    a = ImageSet(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), 4)
    b = ImageSet(torch.ones(1, 3, 4, 4, dtype=torch.uint8), torch.tensor([2]), 4)
    both = ImageSet.concatenate([a, b])
    assert both.labels.tolist() == [0, 1, 2] and both.source[2].eq(1).all()
    files = ImageSet([_save(tmp_path / "x.png")], torch.tensor([0]), 4)
    with pytest.raises(ValueError, match="one storage"):
        ImageSet.concatenate([a, files])
    with pytest.raises(ValueError, match="at least one"):
        ImageSet.concatenate([])
